"""Facts: model architectures (from each model's config.json), GPU specs, shipped calibrations."""
