"""train.py beyond the gate: a forked run, which ablate.py's paired rows rely on."""
import copy

import torch

import train


def without_times(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_a_forked_run_is_the_full_run(test_tensors):
    """Two runs that differ from epoch 3 on (augmentation in the last epoch or not), forked after
    epoch 2 as ablate.py does, give the same numbers as each run done from scratch."""
    images, labels = test_tensors
    data = (images[:1000], labels[:1000], images[1000:2000], labels[1000:2000], "val")
    flags = {clean: train.parse_args(["--epochs", "3", "--batch-size", "64", "--clean-epochs", str(clean)])
             for clean in (0, 1)}
    whole = {clean: without_times(train.run(args, "cpu", data)[1]["history"]) for clean, args in flags.items()}
    state = train.start(flags[0], "cpu", data)
    train.train_epochs(state, flags[0], data, 2)
    rng = torch.get_rng_state()
    for clean, args in flags.items():
        torch.set_rng_state(rng)
        branch = copy.deepcopy(state)
        train.train_epochs(branch, args, data, args.epochs)
        assert without_times(branch.history) == whole[clean]
    assert whole[0][-1] != whole[1][-1]  # the last epoch did differ
