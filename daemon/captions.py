"""Captioning uncaptioned images (missing_captions = "vlm"): the daemon's side.

The model runs in a child process (engines/captioner/worker.py): the daemon never imports mlx.
This module decides what to caption, keeps the cache of generated captions (by image hash and
captioner settings), and writes the results into the snapshot and its captions.jsonl.
"""

from __future__ import annotations

# The instruction the captioner gets; part of the dataset fingerprint (a new prompt, new captions).
CAPTION_PROMPT = (
    "Describe this image in one or two natural-language sentences for training an image model: "
    "the subject, what they wear and do, the setting, the lighting and the style. No lists, no preamble."
)
