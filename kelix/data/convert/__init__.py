"""``kelix data convert``: public dataset formats (pairs, llava/sharegpt, text, t2i, img2dataset,
obelics, hf) to the kit's shards; see :mod:`kelix.data.convert.job` and docs/data.md."""
