"""The bottom layer: atomic writes, hashing, the keyed artifact store, pretrained assets, progress bars."""
