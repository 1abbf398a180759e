"""The paper's comparison (pretrain vs nll vs dpo arms) as one command."""
