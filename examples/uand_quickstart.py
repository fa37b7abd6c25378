"""U-AND in a minute: train a one-layer model on all pairwise ANDs, compare a construction, dissect it."""

import torch

from saelab.uand import DataConfig, ModelConfig, TrainConfig, UANDModel, UANDTask, evaluate, train
from saelab.uand.analysis import analyse
from saelab.uand.constructions import hanni_construction

task = UANDTask(DataConfig(m=30, s=2, op="and"))  # 435 pair outputs
x, inputs = task.sample(1000, torch.Generator().manual_seed(1))  # held-out evaluation inputs

model = UANDModel.for_task(task, ModelConfig(d=20))  # 20 neurons for 435 ANDs
train(model, task, TrainConfig(steps=300, batch_size=128, lr=1e-2))
print("trained:", evaluate(model, task, x, inputs).to_dict())
print("Hänni  :", evaluate(hanni_construction(task, d=20, p=0.5), task, x, inputs).balanced_mse)

report = analyse(model, task, inputs)
print("density:", report["density"], "\nbinarity:", report["binarity"])
