"""The reference numbers of METHOD.md: what each experiment row is compared against.

Rows ``L1``..``L4`` are LeNet/MNIST, ``C1``..``C10`` ResNet-18/CIFAR-10. Accuracies are in %
on the test split; ``forget`` is the accuracy on the forgotten class (MNIST digit 0 /
CIFAR-10 ship), ``retain`` on the other classes; ``finetune_batches`` is None where METHOD.md
gives no count.
"""

# Per row: its setting in METHOD.md's words, forget and retain accuracy, fine-tune batches.
REFERENCE: dict[str, dict] = {
    "L1": {
        "setting": "top-K decay, no fine-tune",
        "forget": 2.96,
        "retain": 92.12,
        "finetune_batches": None,
    },
    "L2": {
        "setting": "random-K decay, no fine-tune",
        "forget": 45.41,
        "retain": 81.75,
        "finetune_batches": None,
    },
    "L3": {
        "setting": "top-K, 7 steps, then fine-tune 1 epoch",
        "forget": 0.61,
        "retain": 99.07,
        "finetune_batches": None,
    },
    "L4": {
        "setting": "top-K, fine-tune 21 batches after each of 7 steps",
        "forget": 2.35,
        "retain": 98.66,
        "finetune_batches": None,
    },
    "C1": {
        "setting": "λ=0.05, 5 steps, no fine-tune",
        "forget": 3.70,
        "retain": 87.28,
        "finetune_batches": 0,
    },
    "C2": {
        "setting": "λ=0.05, 5 steps, + fine-tune 1 epoch",
        "forget": 63.20,
        "retain": 91.54,
        "finetune_batches": 352,
    },
    "C3": {
        "setting": "λ=0.05, 5 steps, + fine-tune 2 epochs",
        "forget": 51.20,
        "retain": 91.22,
        "finetune_batches": 704,
    },
    "C4": {
        "setting": "λ=0.05, 5 steps, + fine-tune 6 epochs",
        "forget": 6.40,
        "retain": 91.28,
        "finetune_batches": 2112,
    },
    "C5": {
        "setting": "no decay, fine-tune 6 epochs",
        "forget": 12.60,
        "retain": 90.92,
        "finetune_batches": 2112,
    },
    "C6": {
        "setting": "λ=0.1, 21 steps, fine-tune 11 batches after each",
        "forget": 3.70,
        "retain": 89.67,
        "finetune_batches": 231,
    },
    "C7": {
        "setting": "λ=0.1, 16 steps, fine-tune 17 batches after each",
        "forget": 4.40,
        "retain": 90.30,
        "finetune_batches": 272,
    },
    "C8": {
        "setting": "as C7, random units",
        "forget": 42.60,
        "retain": 90.66,
        "finetune_batches": 272,
    },
    "C9": {
        "setting": "as C7, importance from 10% of forget-class train",
        "forget": 3.80,
        "retain": 90.22,
        "finetune_batches": 345,
    },
    "C10": {
        "setting": "as C7, importance from 10% of all train",
        "forget": 4.60,
        "retain": 90.61,
        "finetune_batches": 345,
    },
}

# The reference base model before unlearning (% on the test split; ``overall`` = all classes).
REFERENCE_BASE: dict[str, dict] = {"cifar": {"forget": 96.10, "retain": 91.62, "overall": 92.07}}
