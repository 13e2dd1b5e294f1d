"""Input formats, image processing, tokenization, packing and loading."""
