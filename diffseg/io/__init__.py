"""Files in and out: images (``images``), mask records and COCO RLE
(``records``), attention maps (``attention``)."""
