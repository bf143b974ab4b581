"""Frozen networks turned into cached features: the image extraction plan and the detector's runs."""
