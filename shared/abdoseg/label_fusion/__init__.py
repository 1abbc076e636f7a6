"""Label fusion: the fusion rules, pseudo labels, uncertainty selection, rounds and the bundle workflow."""
