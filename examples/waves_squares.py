"""Traveling-wave segmentation of squares by size, against a receptive-field-matched CNN.

Writes ``waves_squares.png``: input, labels, both predictions, and hidden-state movie
frames of the wave model.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from probunroll.data.shapes import square_sizes
from probunroll.waves import (
    LocalCNNSegmenter,
    WaveSegmenter,
    foreground_accuracy,
    train_segmenter,
)

torch.set_num_threads(1)
torch.manual_seed(0)
Xtr, Ytr = square_sizes(300, random_state=0)
Xte, Yte = square_sizes(100, random_state=1)
waves, cnn = WaveSegmenter(1, 4), LocalCNNSegmenter(1, 4, n_layers=4)
train_segmenter(waves, Xtr, Ytr, epochs=10)
train_segmenter(cnn, Xtr, Ytr, epochs=10)
with torch.no_grad():
    lw, states = waves(Xte[:1], return_states=True)
    acc_w = foreground_accuracy(waves(Xte), Yte)
    acc_c = foreground_accuracy(cnn(Xte), Yte)
    lc = cnn(Xte[:1])
fig, axes = plt.subplots(2, 4, figsize=(12, 6))
panels = [
    (Xte[0, 0], "input"),
    (Yte[0], "labels (size class)"),
    (lw.argmax(1)[0], f"waves (fg acc {acc_w:.2f})"),
    (lc.argmax(1)[0], f"CNN-4 (fg acc {acc_c:.2f})"),
]
for ax, (img, title) in zip(axes[0], panels, strict=True):
    ax.imshow(img.numpy(), vmin=0, vmax=3 if "input" not in title else 1)
    ax.set_title(title)
for ax, t in zip(axes[1], [0, 10, 20, 39], strict=True):
    ax.imshow(states[0, t, 0].numpy(), cmap="RdBu_r")
    ax.set_title(f"hidden state, t = {t}")
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout()
fig.savefig("waves_squares.png", dpi=120)
print(f"wrote waves_squares.png; waves {acc_w:.3f}, CNN {acc_c:.3f}")
