"""The assignment's rules, in one place. The gate (test_model.py) holds every model to them;
train.py reads how many epochs' weights to keep, and plots.py where to draw the bar. A course
with other rules changes them here, and nowhere else.
"""
PARAMS_BELOW = 8_000         # every number the model carries: parameters, buffers, tables kept on the side
                             # (BatchNorm's running statistics excepted: they are computed, not learned)
MIN_ACCURACY = 99.40         # percent on the official 10,000-image test set,
LAST_EPOCHS = 3              # in each of the last 3 epochs (one lucky epoch is not a result),
MAX_EPOCHS = 15              # within 15 epochs.
CLASSIFIER_AFTER_GAP = True  # "optionally, a fully-connected layer": one nn.Linear, or a 1x1 conv, on the pooled map
CLASSES = 10                 # the output is (N, 10): logits or log-probabilities
# BatchNorm, Dropout (p > 0, dropping in training) and a global average pool over a map larger than
# 1x1 must each run in forward, and the output must depend on them. After the pool only reshapes,
# dropout, softmax or log_softmax and the optional classifier may follow. Every logit must depend on
# all 784 input pixels. Training mode and eval mode (what is scored) are both held to this.
