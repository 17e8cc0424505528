"""The sharded checkpoint: its format, what it saves (components), resuming from it, the integrity rules every reader applies, and the Hugging Face export."""
