"""WLSC / K-Deep Simplex on two moons: learned atoms and bipartite spectral clustering.

Writes ``wlsc_moons.png``: data coloured by cluster, atoms as black crosses.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from probunroll.coding._train import train_unrolled
from probunroll.coding.wlsc import WLSCAutoencoder, bipartite_spectral_clustering
from probunroll.data.manifolds import two_moons

torch.set_num_threads(1)
X, labels = two_moons(2000, noise=0.05, random_state=0)
X = X.float()
init = X[torch.randperm(2000, generator=torch.Generator().manual_seed(0))[:24]]
model = WLSCAutoencoder(2, 24, lam=5.0, n_layers=15, constraint="simplex", init=init)
train_unrolled(model, X, epochs=200, lr=5e-3)
with torch.no_grad():
    codes = model.encode(X)
pred, _ = bipartite_spectral_clustering(codes, 2)
atoms = model.dictionary.detach()
plt.figure(figsize=(6, 4))
plt.scatter(X[:, 0], X[:, 1], c=pred, s=4, cmap="coolwarm")
plt.scatter(atoms[:, 0], atoms[:, 1], c="k", marker="x", s=40)
plt.title("WLSC: bipartite spectral clustering")
plt.savefig("wlsc_moons.png", dpi=120)
print("wrote wlsc_moons.png")
