"""The released Kelix (``OpenOneRec/Kelix-SFT``, ``OpenOneRec/Kelix-DiT``) in the kit: its config and key
layout, ``kelix convert official`` (release -> kit pipeline directory) and ``kelix convert to-official``
(back). See docs/official.md."""
