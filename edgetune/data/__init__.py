"""Site data: the built-in demo dataset, JSONL files, simulation partitions and prompt encoding."""
