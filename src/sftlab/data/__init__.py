"""Data: load what users have, audit it, tokenize it exactly as it will be trained.

Pipeline, one way, streamed through Arrow files on disk (`datasets`), in up to one process
per core, so memory stays flat in the number of rows:

    sources (files, .gz/.zst, save_to_disk directories, hub ids)
      -> records, each remembering its file and line                 sources.py
      -> examples: a conversation, or raw prompt/completion text      formats.py (normalized)
      -> de-duplicated, split into train/eval without leakage, mixed  prepare.py (hashes, index arrays)
      -> rendered with the model's chat template, trained spans found masks.py (sftlab.templates: what a template does)
      -> token ids + `assistant_masks`                                (what SFTTrainer gets, memory-mapped)
      -> audit                                                        audit.py (what `sftlab check` shows)
      -> cached by content hash                                       cache.py

Bad rows never crash the loader: each becomes a problem with its file and line, which
stops the run (`on_error: fail`) or is counted and skipped (`on_error: skip`).
"""

from sftlab.data.cache import cache_key, default_cache_dir
from sftlab.data.formats import FORMATS, Example, ExampleSequence, checked_messages, detect_format, to_example
from sftlab.data.masks import Rendered, render_example, tokenize_rendered
from sftlab.data.prepare import PreparedData, preparation_settings, prepare_data
from sftlab.data.sources import FILE_SUFFIXES, BadRow, Record, source_list
from sftlab.templates import end_of_turn_marker, end_of_turn_token_id, render, stop_token_ids

__all__ = [
    "FILE_SUFFIXES",
    "FORMATS",
    "BadRow",
    "Example",
    "ExampleSequence",
    "PreparedData",
    "Record",
    "Rendered",
    "cache_key",
    "checked_messages",
    "default_cache_dir",
    "detect_format",
    "end_of_turn_marker",
    "end_of_turn_token_id",
    "preparation_settings",
    "prepare_data",
    "render",
    "render_example",
    "source_list",
    "stop_token_ids",
    "to_example",
    "tokenize_rendered",
]
