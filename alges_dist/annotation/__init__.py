"""Annotation tools: the query batch out with the model's masks as pre-annotations, people's labels back.

- ``codecs``: the run-length encodings of Label Studio (brush), CVAT and COCO, in numpy;
- ``labelstudio``, ``cvat``, ``coco``: each tool's files, written and read;
- ``formats``: the registry of the three formats, export folders, format detection;
- ``regions``: the checks every import passes (picks, classes, sizes, overlaps, unpainted
  pixels) and the correction effort against the pre-annotation;
- ``pool_encoding``: class ids back into the pool's own mask encoding;
- ``labelstudio_api``: the REST client of ``loop.oracle: labelstudio``.

``alges_dist.handoff`` is the entry point the loop and the CLI call.
"""
