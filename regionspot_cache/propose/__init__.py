"""``rs-cache propose``: proposals (with the detector's own classes) from open-vocabulary detectors.

``detectors`` (one adapter per family), ``select`` (chunks -> NMS -> top K), ``worker`` (a shard),
``writer`` (shard files, the proposal file, its provenance), ``distribute``, ``runner``.
"""
