"""The course's rules, in one place: the whole configuration of a course that adopts this gate.
The gate (test_model.py), train.py, the figures, the README's generated blocks and the project's own
tests all read them from here. A course with other rules changes them here, and nowhere else.
"""
PARAMS_BELOW = 8_000    # every number the model carries must be fewer than this (BatchNorm's running
                        # statistics excepted: they are computed, not learned)
MIN_ACCURACY = 99.40    # percent on the official 10,000-image test set, reached
LAST_EPOCHS = 3         # in each of the run's last epochs (one lucky epoch is not a result),
MAX_EPOCHS = 15         # in a run of at most this many epochs. train.py's default run is this long.
CLASSES = 10            # the output is (N, 10): logits or log-probabilities

# The parts a model must use. Each required part must run in forward and the output must depend on
# it, in training mode and in eval mode (what is scored).
REQUIRE_BATCHNORM = True  # nn.BatchNorm1d/2d or F.batch_norm
REQUIRE_DROPOUT = True    # a dropout with p > 0 that drops in training
REQUIRE_GAP = True        # a global average pool over a map larger than 1x1
# Where a fully-connected layer (one that mixes all positions of a map at once) may run:
#   "after-gap": only one, classifying the pooled vector (nn.Linear or a 1x1 conv after the pool);
#   "anywhere":  no limit;
#   "nowhere":   none at all, not even after the pool.
FULLY_CONNECTED = "after-gap"
# Every logit must depend on all 784 input pixels.
