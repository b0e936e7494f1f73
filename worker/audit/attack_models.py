"""The attack classifiers: small MLPs on posterior-derived feature vectors, trained with BCE
and Adam. The model training loop (``worker.training.train``) fits image classifiers on
SampleSets; these fit binary member/non-member labels on float features, hence this loop."""

import torch
from torch import nn

Tensors = dict[str, torch.Tensor]


def attack_mlp(in_features: int) -> nn.Sequential:
    """Graves et al.'s attack model: in -> 256 -> 128 -> 1, ReLU, dropout 0.5 (sigmoid in the
    loss and in ``member_probability``)."""
    return nn.Sequential(
        nn.Linear(in_features, 256),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(128, 1),
    )


def fit_attack(
    features: torch.Tensor, is_member: torch.Tensor, epochs: int, batch_size: int, seed: int
) -> nn.Sequential:
    torch.manual_seed(seed)
    model = attack_mlp(features.shape[1])
    optimizer = torch.optim.Adam(model.parameters())
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(features), generator=order).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.binary_cross_entropy_with_logits(
                model(features[batch]).squeeze(1), is_member[batch].float()
            )
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def member_probability(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    if len(features) == 0:
        return torch.empty(0)
    return torch.sigmoid(model.eval()(features).squeeze(1))


def stacked_state(models: list[nn.Sequential]) -> Tensors:
    return dict(nn.ModuleList(models).state_dict())


def unstack_state(tensors: Tensors, count: int, in_features: int) -> list[nn.Sequential]:
    models = nn.ModuleList(attack_mlp(in_features) for _ in range(count))
    models.load_state_dict(tensors)
    return [model.eval() for model in models]  # type: ignore[misc]
