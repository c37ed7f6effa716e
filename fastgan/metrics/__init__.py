"""Image quality: `fastgan eval` and --eval-every (evaluate.py), ProGAN's sliced Wasserstein distance (swd.py), and
FID and KID (fid.py) from pytorch-fid's Inception network (inception.py). Nothing here trains; the training core
calls evaluate.DuringTraining at epoch ends."""
