"""ReLoRA itself: the adapted layer and its algebra, the setting rules, the named steps of a distributed run, the learning-rate schedule and the quantized frozen base."""
