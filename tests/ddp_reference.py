"""PyTorch's own data-parallel training of the run test_dist.py gives vggctl,
launched by torchrun like vggctl: DistributedDataParallel over Gloo, each
epoch's order split by torch.utils.data.DistributedSampler, SGD with
momentum and weight decay, and the same per-rank random draws (dropout)
because every step seeds the generator as vggctl does. Rank 0 writes the
final state dict.

    torchrun --nproc-per-node 2 tests/ddp_reference.py --data DIR --init FILE --out FILE ...

With --as-one-process N it is instead one process that trains on what N
ranks would see together: each step's batch is the concatenation of the N
ranks' batches (what SyncBatchNorm over N ranks computes, for a model
without dropout); with N = 1, vggctl's one-process run. --clip-grad-norm
clips with torch.nn.utils.clip_grad_norm_ before each step.
"""
import argparse
import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

import vgg_reference

MASK = (1 << 64) - 1
PERMUTATION_STEP = MASK  # usize::MAX: the position whose seed draws an epoch's order


def position_seed(seed, epoch, step):
    """vggctl's seed for (seed, epoch, step) (train::position_seed, splitmix64)."""
    z = seed ^ ((epoch * 0x9E3779B97F4A7C15) & MASK) ^ ((step * 0xD1B54A32D192ED03) & MASK)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return (z ^ (z >> 31)) >> 1


def rank_seed(seed, rank):
    """vggctl's seed for a rank's own draws (dist::World::seed_for)."""
    return seed ^ ((rank * 0xA24BAED4963EE407) & MASK)


def read_cifar_bin(path):
    raw = open(path, "rb").read()
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, 3073)
    return t[:, 1:].reshape(-1, 3, 32, 32).clone(), t[:, 0].long().clone()


def train_split(data_dir, limit):
    parts = [read_cifar_bin(os.path.join(data_dir, f"data_batch_{i}.bin")) for i in range(1, 6)]
    images = torch.cat([p[0] for p in parts])[:limit]
    labels = torch.cat([p[1] for p in parts])[:limit]
    return images, labels


def normalize(images, mean, std):
    """vggctl's Normalizer: x * (1 / (255 std)) + (-mean / std), in fp32."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float64).float()
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float64).float()
    return images.float() * scale.view(1, 3, 1, 1) + shift.view(1, 3, 1, 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--arch", default="vgg11")
    p.add_argument("--bn", action="store_true")
    p.add_argument("--limit-train", type=int, required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head", default="cifar")
    p.add_argument("--as-one-process", type=int, default=0, metavar="N")
    p.add_argument("--clip-grad-norm", type=float, default=None)
    a = p.parse_args()

    one = a.as_one_process > 0
    if one:
        ranks, world = list(range(a.as_one_process)), a.as_one_process
    else:
        dist.init_process_group("gloo")
        ranks, world = [dist.get_rank()], dist.get_world_size()
    model = vgg_reference.build(a.arch, a.bn, a.head, 10)
    model.load_state_dict(load_file(a.init))
    ddp = model if one else DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay)
    images, labels = train_split(a.data, a.limit_train)
    x_all = normalize(images, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    n = len(labels)
    for epoch in range(a.epochs):
        torch.manual_seed(position_seed(a.seed, epoch, PERMUTATION_STEP))
        perm = torch.randperm(n)
        shards = [perm[list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False))]
                  for r in ranks]
        model.train()
        for step, start in enumerate(range(0, len(shards[0]), a.batch_size)):
            idx = torch.cat([mine[start : start + a.batch_size] for mine in shards])
            torch.manual_seed(position_seed(rank_seed(a.seed, ranks[0]), epoch, step))
            loss = torch.nn.functional.cross_entropy(ddp(x_all[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            if a.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip_grad_norm)
            opt.step()
    if ranks[0] == 0:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, a.out)
    if not one:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
