"""Training curves from a metrics history: loss and accuracy per epoch, train vs. evaluation."""
import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt


def save_curves(history, path):
    split = "test" if "test_accuracy" in history[0] else "val"
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], "o-", label=split)
    ax_loss.set(title="loss", xlabel="epoch", yscale="log")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train (augmented)")
    ax_acc.plot(epochs, [h[f"{split}_accuracy"] for h in history], "o-", label=split)
    ax_acc.axhline(99.4, color="gray", linestyle="--", linewidth=1, label="99.40% bar")
    ax_acc.set(title="accuracy (%), 97 to 100", xlabel="epoch", ylim=(97, 100))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
