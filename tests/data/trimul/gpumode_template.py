"""GPUMode's TriMul submission template, unmodified in interface: the reference nn.Module loaded with the
task's weights. It imports `input_t`/`output_t` from the task module and reads GPUMode's weight names."""

import torch
from task import input_t, output_t
from torch import einsum, nn


class TriMul(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.left_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.right_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.left_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.right_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.out_gate = nn.Linear(dim, hidden_dim, bias=False)
        self.to_out_norm = nn.LayerNorm(hidden_dim)
        self.to_out = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        left = self.left_proj(x)
        right = self.right_proj(x)
        mask = mask.unsqueeze(-1)
        left = left * mask
        right = right * mask
        left_gate = self.left_gate(x).sigmoid()
        right_gate = self.right_gate(x).sigmoid()
        out_gate = self.out_gate(x).sigmoid()
        left = left * left_gate
        right = right * right_gate
        out = einsum("... i k d, ... j k d -> ... i j d", left, right)
        out = self.to_out_norm(out)
        out = out * out_gate
        return self.to_out(out)


def custom_kernel(data: input_t) -> output_t:
    input_tensor, mask, weights, config = data
    trimul = TriMul(dim=config["dim"], hidden_dim=config["hidden_dim"]).to(input_tensor.device)
    trimul.norm.weight = nn.Parameter(weights["norm.weight"])
    trimul.norm.bias = nn.Parameter(weights["norm.bias"])
    trimul.left_proj.weight = nn.Parameter(weights["left_proj.weight"])
    trimul.right_proj.weight = nn.Parameter(weights["right_proj.weight"])
    trimul.left_gate.weight = nn.Parameter(weights["left_gate.weight"])
    trimul.right_gate.weight = nn.Parameter(weights["right_gate.weight"])
    trimul.out_gate.weight = nn.Parameter(weights["out_gate.weight"])
    trimul.to_out_norm.weight = nn.Parameter(weights["to_out_norm.weight"])
    trimul.to_out_norm.bias = nn.Parameter(weights["to_out_norm.bias"])
    trimul.to_out.weight = nn.Parameter(weights["to_out.weight"])
    with torch.no_grad():
        return trimul(input_tensor, mask)
