"""A stand-in for diffseg.Model with planted attention (diffseg.synthetic), for
tests of everything around the model (batching, CLI, records) without torch.

Like the tiny 128 px test bundle: ``image_size`` 128, ``multiple`` 64, 8 image
pixels per position of the finest grid, so ``frame="crop"`` gives a 16 x 16
grid and ``frame="whole"`` the grid of the image's padded whole frame (16 x 24
for a 2:3 image).
"""

from diffseg.io.images import load_image, whole_frame_geometry
from diffseg.synthetic import planted_example


class PlantedModel:
    image_size, multiple, pixels_per_position = 128, 64, 8

    def __init__(self, n_segments=4, seed=0):
        self.n_segments, self.seed = n_segments, seed
        self.info, self.metadata, self.path = {"timestep": 300}, {"model_id": "planted"}, "planted"
        self.calls, self.closed = 0, False

    def grid(self, image, frame):
        """The finest attention grid ``(h, w)`` of an image in ``frame``."""
        if frame == "crop":
            side = self.image_size // self.pixels_per_position
            return side, side
        height, width = load_image(image).shape[:2]
        g = whole_frame_geometry(height, width, self.image_size, self.multiple)
        return g.frame_height // self.pixels_per_position, g.frame_width // self.pixels_per_position

    def planted(self, image):
        """``(n_segments, seed)`` of an image's planted segments (subclasses vary them per image)."""
        return self.n_segments, self.seed

    def attention(self, image, timestep=None, frame="crop"):
        self.calls += 1
        n_segments, seed = self.planted(image)
        return planted_example(shape=self.grid(image, frame), n_segments=n_segments, seed=seed)[0]

    def close(self):
        self.closed = True
