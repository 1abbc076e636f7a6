"""Training: the losses and the ignite handlers the bundles' train configs use."""
