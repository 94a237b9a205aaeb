"""The embedded demo: a generated LVIS-format dataset and tiny random-weight encoders."""
