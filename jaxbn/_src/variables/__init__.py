"""Tools on a model's variables, Linen dicts and NNX states alike: module paths, the NNX state
mapping, freeze / unfreeze / optimiser masks, folding. Below both module APIs, which use them."""
