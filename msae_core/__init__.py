"""msae: train, evaluate and inspect sparse autoencoders, the momentum SAE among them."""

__version__ = "0.1.0"
