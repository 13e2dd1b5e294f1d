"""Input formats, image processing, tokenization, packing and loading.

Row -> batch path (each module has one job):

- ``formats``    JSONL/Parquet readers, shards, random access (:class:`~vlr_runtime.data.formats.RowIndex`), row
                 layouts (pairs, VL-RewardBench, RewardBench) -> ``PairExample``/``RankExample``
- ``images``     safe decode (pixel cap before decode, truncation, EXIF, RGBA on white)
- ``processor``  ``smart_resize`` + patchify, bit-identical to transformers' Qwen2-VL PIL image processor
- ``tokenize``   chat template, ``<|image_pad|>`` expansion, scored token, length policy
- ``collate``    ``Preprocessor`` (a row, images decoded once) and ``collate`` (-> ``PackedBatch``)
- ``positions``  M-RoPE position ids of packed sequences (incl. the shared-prompt layout)
- ``windows``    vision window index / inverse / cu_seqlens / rope ids for the ViT
- ``packing``    DP rank balancing and microbatch packing under a token budget
- ``loader``     deterministic, resumable, rank-consistent training loader with worker processes
- ``validate``   ``python -m vlr_runtime.data.validate`` report;  ``convert``: public layouts -> pair JSONL
- ``native``     the C++ twins (``vlr_runtime._C``) of positions/windows/packing, picked here
- ``errors``     ``DataError`` and the reason codes every stage counts
"""
