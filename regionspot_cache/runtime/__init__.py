"""Small helpers shared by the phases, one module per concern: ``devices`` (devices, torch threads),
``weights`` (safe weight loading), ``files`` (hashes, TOML, atomic writes, cleanup after killed
writers), ``records`` (what differs between two records)."""
