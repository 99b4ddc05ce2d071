"""Process plumbing every entry script shares: user errors and their one-line exit (``errors``),
device and autocast (``device``), DDP helpers (``distributed``), logging (``logger``), atomic
writes (``atomic_io``), checkpoint files (``checkpoint``), seeds and RNG state (``rng``),
weight downloads (``hub``), the argparse formatter (``cli``)."""
