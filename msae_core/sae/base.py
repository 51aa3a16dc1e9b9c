"""The shared SAE: config, registry, encoder/decoder parameters and the pieces every base uses.

    x_n   = x * input_scale                           # fixed scalar so that E||x_n|| = sqrt(D)
    f     = act(W_enc^T (x_n - b_dec) + b_enc)        # (B, F)
    x_hat = (W_dec^T f + b_dec) / input_scale         # (B, D)

Losses are computed in the normalised units, so one l1 coefficient means the same thing on any
model. `input_scale` is a buffer (saved with the weights); it is 1 until `fit_input_scale_`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple

import torch
from torch import nn

from msae_core.configutil import Problem


_REGISTRY: dict[str, type["SAE"]] = {}

# The dead-latent window (tokens without firing before a latent counts dead and AuxK trains it) of a
# run of T training tokens: T / 20, at least 100,000 and at most 10M. bench/quality.py measured
# 100,000 best in runs of 2M tokens (T / 20: 500,000 left most dying latents firing now and then, out
# of AuxK's reach); Gao et al. 2024, sparsify and dictionary_learning count 10M tokens in runs of
# hundreds of millions to billions. Between the two the rule is a prior, not a measurement.
DEAD_TOKENS_FLOOR = 100_000
DEAD_TOKENS_CAP = 10_000_000
DEAD_TOKENS_FRACTION = 20


def auto_dead_tokens(train_tokens: int) -> int:
    """The dead window for a run of `train_tokens` training tokens (the rule above)."""
    return int(min(DEAD_TOKENS_CAP, max(DEAD_TOKENS_FLOOR, int(train_tokens) // DEAD_TOKENS_FRACTION)))


def dead_window(cfg: "SAEConfig") -> int:
    """The dead window an SAE config means: its dead_tokens_threshold, or where that is 0 (auto, not
    yet resolved by a trainer: an SAE built outside one, an imported SAE) the floor, 100,000."""
    return int(cfg.dead_tokens_threshold) or DEAD_TOKENS_FLOOR


def register_sae(name: str) -> Callable[[type["SAE"]], type["SAE"]]:
    def deco(cls: type["SAE"]) -> type["SAE"]:
        _REGISTRY[name] = cls
        cls.arch_name = name
        return cls
    return deco


def registered_archs() -> list[str]:
    return sorted(_REGISTRY)


def momentum_bases() -> list[str]:
    """The architectures a momentum SAE can wrap: every registered one but momentum itself."""
    return [name for name in registered_archs() if name != "momentum"]


def sae_class(name: str) -> type["SAE"]:
    """The class registered under `name`; ValueError when there is none."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown SAE architecture {name!r}; known: {', '.join(registered_archs())}")
    return _REGISTRY[name]


class OneProcess:
    """How an SAE's statistics see the other data-parallel ranks: here, one process, itself alone.
    The trainer gives a data-parallel SAE the ranks' collectives instead (`SAE.set_collectives`;
    msae_core.dist.RankCollectives has the same three methods and `world`), so that sae/ stays pure math."""

    def any_fired(self, fired_F: torch.Tensor) -> torch.Tensor:
        """Per latent, whether it fired on any rank."""
        return fired_F

    def global_rows(self, n: int) -> int | torch.Tensor:
        """The rows of the global batch, given this rank's `n`."""
        return n

    def all_min_(self, t: torch.Tensor) -> torch.Tensor:
        """The ranks' smallest `t`, in place."""
        return t

    @property
    def world(self) -> int:
        return 1


ONE_PROCESS = OneProcess()


@dataclass
class MomentumConfig:
    """The momentum SAE's knobs (msae_core.sae.tracker has the equations): the EMA rate, the
    competition threshold, the penalty's coefficient and the candidate table's shape. On the command
    line and as sweep axes they keep their bare names (--lam, lam=0,0.1)."""

    beta: float = field(default=0.95, metadata={"help": "momentum rate of the per-feature and per-pair EMAs"})
    tau: float = field(default=0.4, metadata={"help": "competition threshold on the pair score kappa"})
    lam: float = field(default=0.3, metadata={
        "help": "competition penalty coefficient lambda (0: the momentum machinery tracks, no penalty)"})
    n_candidates: int = field(default=16, metadata={"help": "candidate pairs kept per feature (C)"})
    cofire_top: int = field(default=8, metadata={
        "help": "per token, the strongest active latents whose co-firing is tracked (momentum)"})
    admit_frac: float = field(default=0.5, metadata={
        "help": "a batch pair enters the candidate table when its co-firing score s_ij >= admit_frac * tau"})
    refresh_every: int = field(default=250, metadata={
        "help": "steps between decoder-cosine neighbour refreshes of the candidate table"})

    def problems(self) -> list[Problem]:
        out = []
        if not 0 <= self.beta < 1:
            out.append(Problem("beta", f"beta must be in [0, 1) (got {self.beta})"))
        if not 0 <= self.tau <= 1:
            out.append(Problem("tau", f"tau must be in [0, 1] (got {self.tau})"))
        if not self.lam >= 0:
            out.append(Problem("lam", f"lam must be >= 0 (got {self.lam})"))
        if self.n_candidates < 1:
            out.append(Problem("n_candidates", f"n_candidates must be >= 1 (got {self.n_candidates})"))
        if self.cofire_top < 2:
            out.append(Problem("cofire_top", f"cofire_top must be >= 2 (got {self.cofire_top})"))
        if not 0 <= self.admit_frac <= 1:
            out.append(Problem("admit_frac", f"admit_frac must be in [0, 1] (got {self.admit_frac})"))
        if self.refresh_every < 0:
            out.append(Problem("refresh_every", f"refresh_every must be >= 0 (got {self.refresh_every})"))
        return out


MOMENTUM_FIELDS = tuple(f.name for f in dataclasses.fields(MomentumConfig))


def nest_momentum(sae: dict) -> dict:
    """An SAE config's json with the momentum knobs written flat (`beta`, `lam`, ... beside `arch`:
    every config before MomentumConfig) moved under `momentum`; a nested one is returned as it is."""
    flat = {k: sae[k] for k in MOMENTUM_FIELDS if k in sae}
    if not flat:
        return sae
    out = {k: v for k, v in sae.items() if k not in flat}
    nested = out.get("momentum")
    out["momentum"] = {**flat, **nested} if isinstance(nested, dict) else (flat if nested is None else nested)
    return out


@dataclass
class SAEConfig:
    """What an SAE is: architecture, sizes and the knobs of its loss."""

    arch: Literal["topk", "relu", "batchtopk", "matryoshka", "jumprelu", "momentum"] = field(default="topk", metadata={
        "help": "architecture: topk, batchtopk, matryoshka (BatchTopK with nested prefix losses), "
                "jumprelu (learned thresholds), relu (standard L1) or momentum (wraps --base)"})
    d_in: int = field(default=0, metadata={"help": "input width (taken from the activation store when 0)"})
    d_sae: int = field(default=4096, metadata={"help": "dictionary size F"})
    k: int = field(default=32, metadata={"help": "active latents per token (topk; batchtopk: on average)"})
    l1_coeff: float = field(default=0.04, metadata={"help": "L1 coefficient (relu)"})
    auxk_coeff: float = field(default=1 / 32, metadata={"help": "AuxK loss coefficient (topk, batchtopk)"})
    threshold_beta: float = field(default=0.999, metadata={
        "help": "batchtopk: EMA rate of the inference threshold (a running mean for the first 1/(1-rate) steps)"})
    l0_coeff: float = field(default=1.0, metadata={
        "help": "jumprelu: coefficient of the L0 penalty (of (L0 / target_l0 - 1)^2 when target_l0 > 0)"})
    target_l0: float = field(default=0.0, metadata={"help": "jumprelu: the L0 aimed at (0: penalise L0 itself)"})
    jumprelu_bandwidth: float = field(default=0.1, metadata={
        "help": "jumprelu: width of the straight-through estimator's rectangle kernel"})
    jumprelu_init_threshold: float = field(default=0.1, metadata={"help": "jumprelu: initial thresholds"})
    matryoshka_widths: list[int] = field(default_factory=list, metadata={
        "help": "matryoshka: nested prefix widths, increasing, d_sae appended (empty: d_sae/16, d_sae/4, d_sae)"})
    dead_tokens_threshold: int = field(default=0, metadata={
        "help": "a latent that has not fired for this many tokens counts as dead (and AuxK trains it); "
                "0 = from the run's length: a twentieth of its tokens, 100,000 to 10M"})
    base: Literal["topk", "relu", "batchtopk", "matryoshka", "jumprelu"] = field(default="topk", metadata={
        "help": "base of a momentum SAE"})
    momentum: MomentumConfig = field(default_factory=lambda: MomentumConfig(), metadata={
        "help": "momentum: the tracker's and the penalty's knobs"})
    seed: int = field(default=0, metadata={"help": "seed of the weight initialisation"})

    @property
    def base_arch(self) -> str:
        """The sparsity architecture (whose activation and loss the SAE uses): `base` for a
        momentum SAE, else `arch`."""
        return self.base if self.arch == "momentum" else self.arch

    def problems(self) -> list[Problem]:
        out = []
        if self.arch not in _REGISTRY:
            out.append(Problem("arch", f"arch must be one of {', '.join(registered_archs())} (got {self.arch!r})"))
        if self.d_in < 0:
            out.append(Problem("d_in", f"d_in must be >= 1 (got {self.d_in})"))
        if self.d_sae < 1:
            out.append(Problem("d_sae", f"d_sae must be >= 1 (got {self.d_sae})"))
        if self.base_arch in _REGISTRY and _REGISTRY[self.base_arch].sparsity == "k" \
                and not 1 <= self.k <= max(self.d_sae, 1):
            out.append(Problem("k", f"k must be in [1, d_sae={self.d_sae}] (got {self.k})"))
        if self.l1_coeff < 0:
            out.append(Problem("l1_coeff", f"l1_coeff must be >= 0 (got {self.l1_coeff})"))
        if self.dead_tokens_threshold < 0:
            out.append(Problem("dead_tokens_threshold", f"dead_tokens_threshold must be >= 0 (0: from the run's length) (got {self.dead_tokens_threshold})"))
        if self.auxk_coeff < 0:
            out.append(Problem("auxk_coeff", f"auxk_coeff must be >= 0 (got {self.auxk_coeff})"))
        if self.arch == "momentum" and self.base not in momentum_bases():
            out.append(Problem("base", f"base must be one of {', '.join(momentum_bases())} (got {self.base!r})"))
        if self.l0_coeff < 0 or self.target_l0 < 0:
            out.append(Problem("l0_coeff", f"l0_coeff and target_l0 must be >= 0 (got {self.l0_coeff}, {self.target_l0})"))
        if not self.jumprelu_bandwidth > 0 or not self.jumprelu_init_threshold > 0:
            out.append(Problem("jumprelu_bandwidth", f"jumprelu_bandwidth and jumprelu_init_threshold must be > 0 (got "
                       f"{self.jumprelu_bandwidth}, {self.jumprelu_init_threshold})"))
        if self.base_arch in _REGISTRY and self.d_sae >= 1:
            out += _REGISTRY[self.base_arch].config_problems(self)
        if not 0 <= self.threshold_beta < 1:
            out.append(Problem("threshold_beta", f"threshold_beta must be in [0, 1) (got {self.threshold_beta})"))
        return out


class ActiveLatents(NamedTuple):
    """A batch's latents as entries (token, latent, value), ordered by token: every latent not
    among them is 0 for that token (an entry's value may be 0 too). `per_token` = K when every token
    has exactly K entries (TopK: val_N.view(B, K)), 0 when the count varies (BatchTopK)."""

    val_N: torch.Tensor  # (N,) activations, with grad
    tok_N: torch.Tensor  # (N,) long token of each, ascending
    lat_N: torch.Tensor  # (N,) long latent of each, distinct within a token
    per_token: int


class SAEOutput(NamedTuple):
    x_hat: torch.Tensor  # (B, D) reconstruction, input units
    f: torch.Tensor  # (B, F) latent activations
    pre_acts: torch.Tensor  # (B, F) encoder pre-activations
    active: ActiveLatents | None = None  # the same latents as entries, where the base has them


class StepOutput(NamedTuple):
    """What one training step's forward gives the trainer (`SAE.loss_terms`)."""

    losses: dict[str, torch.Tensor]  # loss terms in normalised units; "loss" is the total
    out: SAEOutput  # the forward outputs the loss was computed from


def build_sae(cfg: SAEConfig) -> "SAE":
    cls = sae_class(cfg.arch)
    if cfg.d_in < 1:
        raise ValueError("d_in must be set (>= 1) before building an SAE")
    return cls(cfg)


class SAE(nn.Module):
    """Parameters and encode/decode shared by the bases. Subclasses define `activation` and
    `loss_terms`; the decoder rows are kept at unit norm by `post_step_`.

    The trainer's contract, all of it defined here (no probing for optional methods):
        fit_input_scale_(sample)   once, before the first step of a fresh run
        loss_terms(x, step)        -> StepOutput, once per step; the dead-latent counter changes here
        take_in_(out, step, whole) right after loss_terms, before the optimizer step: statistics over
                                   the whole batch (`whole`: every rank's latent rows, which the
                                   trainer gathers when `takes_whole_batch`; None in one process)
        post_step_(step)           after the optimizer step
        drain_events()             competition events raised since the last call ([] here)
        step_counts()              counters logged with each metrics line
        observables()              a trace snapshot's tensors, a NamedTuple (None here: no snapshot)
    """

    arch_name = "base"
    sparsity = "k"  # the knob that sets its sparsity: "k", "l1_coeff" or "l0_coeff"
    saelens_architecture = ""  # its name in SAELens's cfg.json

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        D, F = cfg.d_in, cfg.d_sae
        g = torch.Generator().manual_seed(cfg.seed)  # never the global RNG: momentum must match its base
        W_dec_FD = torch.randn(F, D, generator=g)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_FD)  # (F, D), unit-norm rows
        self.W_enc = nn.Parameter(W_dec_FD.T.clone())  # (D, F), tied at init
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.b_dec = nn.Parameter(torch.zeros(D))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("tokens_since_fired", torch.zeros(F, dtype=torch.long))
        self.collectives: OneProcess = ONE_PROCESS  # the ranks' under torchrun (set_collectives)

    def set_collectives(self, collectives: OneProcess) -> None:
        """Statistics over every data-parallel rank's rows from now on (the trainer's call)."""
        self.collectives = collectives

    # -- the math --------------------------------------------------------------------------------
    def pre_activation(self, x_n_BD: torch.Tensor) -> torch.Tensor:
        # the bias in the product's dtype: under bf16 autocast the (B, F) pre-activation stays
        # bf16 (an fp32 b_enc promoted it, and every later (B, F) tensor, to fp32)
        h_BF = (x_n_BD - self.b_dec) @ self.W_enc
        return h_BF + self.b_enc.to(h_BF.dtype)

    def activation(self, pre_BF: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode_n(self, f_BF: torch.Tensor) -> torch.Tensor:
        x_BD = f_BF @ self.W_dec
        return x_BD + self.b_dec.to(x_BD.dtype)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_activation(x_BD * self.input_scale))

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        return self._decode_n(f_BF) / self.input_scale

    def forward(self, x_BD: torch.Tensor) -> SAEOutput:
        pre = self.pre_activation(x_BD * self.input_scale)
        f = self.activation(pre)
        return SAEOutput(self.decode(f), f, pre)

    def _forward_n(self, x_n_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = self.pre_activation(x_n_BD)
        f = self.activation(pre)
        return self._decode_n(f), f, pre

    # -- training --------------------------------------------------------------------------------
    def loss_terms(self, x_BD: torch.Tensor, step: int) -> StepOutput:
        """Loss terms (in normalised units; "loss" is the total) and the forward outputs."""
        raise NotImplementedError

    takes_whole_batch = False  # True: take_in_ wants every data-parallel rank's latent rows

    @torch.no_grad()
    def take_in_(self, out: SAEOutput, step: int, whole_BF: torch.Tensor | None = None) -> None:
        """Statistics of the whole batch `loss_terms` just scored (none here: the momentum SAE's)."""

    def training_loss(self, x_BD: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One process's step: loss_terms, then take_in_ (tests and benchmarks; the trainer calls both)."""
        losses, out = self.loss_terms(x_BD, step)
        self.take_in_(out, step)
        return losses

    @torch.no_grad()
    def _track_firing_(self, f_BF: torch.Tensor) -> None:
        """Tokens since each latent last fired, over the whole batch (every rank's rows when
        training data-parallel: `collectives`)."""
        fired = self.collectives.any_fired((f_BF > 0).any(dim=0))
        self.tokens_since_fired += self.collectives.global_rows(f_BF.shape[0])
        self.tokens_since_fired.masked_fill_(fired, 0)  # not t[fired] = 0: a boolean index waits for the GPU
        if self.tokens_since_fired.is_cuda:  # the next step's dead count, copied to the host meanwhile
            host = torch.empty((), dtype=torch.long, pin_memory=True)
            host.copy_(self.dead_mask.sum(), non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._dead_count_copy = (host, done, self._counter_version())

    def _counter_version(self) -> tuple[int, int]:
        """The firing counter's storage and in-place version: changed by anything that writes it."""
        return self.tokens_since_fired.data_ptr(), self.tokens_since_fired._version

    def dead_count(self) -> int:
        """How many latents are dead now, on the host. On CUDA it is read from the copy the last
        firing update started, waiting for that copy only (the steps queued after it go on): one
        step's AuxK needs the count as a number, and reading it off the device would wait for
        everything queued. Counted here when the counter changed since (a checkpoint loaded)."""
        copy = getattr(self, "_dead_count_copy", None)
        if copy is not None and copy[2] == self._counter_version():
            copy[1].synchronize()
            return int(copy[0])
        return int(self.dead_mask.sum())

    @property
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= dead_window(self.cfg)

    @torch.no_grad()
    def unit_norm_decoder_(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def post_step_(self, step: int) -> None:
        self.unit_norm_decoder_()

    @torch.no_grad()
    def fit_input_scale_(self, x_BD: torch.Tensor) -> None:
        """Set the fixed input scale so that the mean input norm becomes sqrt(D) (as SAELens's
        'expected_average_only_in' normalisation), and b_dec to the scaled mean input."""
        scale = (self.cfg.d_in ** 0.5) / x_BD.float().norm(dim=1).mean().clamp_min(1e-8)
        self.input_scale.copy_(scale)
        self.b_dec.copy_((x_BD.float() * scale).mean(0))

    @classmethod
    def config_problems(cls, cfg: SAEConfig) -> list[Problem]:
        """Problems of the fields only this architecture reads (SAEConfig.problems asks)."""
        return []

    def jump_thresholds(self) -> torch.Tensor | None:
        """Per-latent thresholds of a JumpReLU-style inference (f = relu(pre) where pre > theta), for
        the SAELens export; None when the SAE has none."""
        return None

    def step_counts(self) -> dict[str, float]:
        return {"dead_features": float(self.dead_mask.sum())}

    def drain_events(self) -> list:
        return []

    def observables(self) -> NamedTuple | None:
        return None


def mse_loss(x_n_BD: torch.Tensor, x_hat_n_BD: torch.Tensor) -> torch.Tensor:
    """||x - x_hat||^2 summed over D, averaged over the batch."""
    return (x_n_BD - x_hat_n_BD).pow(2).sum(-1).mean()
