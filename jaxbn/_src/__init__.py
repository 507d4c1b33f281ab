"""jaxbn's implementation, one package per layer (see the README's Layout); the public modules re-export it."""
