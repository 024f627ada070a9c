"""The text pass of prompts in groups that share their first P tokens (vprompt.py): the C prompts
of a draw r are [SOS][V + r] then each class's own tokens. Under the causal mask the P shared
positions never see a class token, so their activations are the same in all C prompts: they are
computed once per group, and each class position attends to them and to the class positions
before it. The features equal the text encoder's on the whole prompts (vprompt.py's readable
path; tested), with the shared positions' work done once instead of C times (for "a photo of a"
and short class names, about half of it).
"""
import torch
import torch.nn.functional as F


def shared_prefix_encode(enc, shared, tails, eot):
    """enc: a method file's TextEncoder (open_clip's blocks, positional embedding, final norm and
    projection); shared: [N, P, d] the shared positions of N groups; tails: [C, T, d] the class
    positions (the same in every group); eot: [C] EOT positions in the whole prompt (>= P).
    Returns the features [N, C, D] of the N * C whole prompts."""
    (n, p, d), (n_cls, t) = shared.shape, tails.shape[:2]
    x = shared + enc.positional_embedding[:p]  # [N, P, d]
    y = (tails + enc.positional_embedding[p:p + t]).expand(n, -1, -1, -1).flatten(0, 1)
    # class position i (position P + i of the prompt) sees the P shared and class positions <= i
    mask = torch.ones(t, p + t, dtype=torch.bool, device=x.device).tril(p)
    n_heads = enc.resblocks[0].attn.num_heads
    heads = lambda z: z.unflatten(-1, (n_heads, -1)).transpose(1, 2)  # noqa: E731 [., h, len, d/h]
    for block in enc.resblocks:  # open_clip's ResidualAttentionBlock, its attention written out
        attn = block.attn
        q_x, k_x, v_x = map(heads, F.linear(block.ln_1(x), attn.in_proj_weight,
                                            attn.in_proj_bias).chunk(3, -1))
        q_y, k_y, v_y = map(heads, F.linear(block.ln_1(y), attn.in_proj_weight,
                                            attn.in_proj_bias).chunk(3, -1))
        out_x = F.scaled_dot_product_attention(q_x, k_x, v_x, is_causal=True)  # [N, h, P, d/h]
        k = torch.cat([k_x.repeat_interleave(n_cls, dim=0), k_y], dim=2)  # [NC, h, P+T, d/h]
        v = torch.cat([v_x.repeat_interleave(n_cls, dim=0), v_y], dim=2)
        out_y = F.scaled_dot_product_attention(q_y, k, v, attn_mask=mask)  # [NC, h, T, d/h]
        x = x + block.ls_1(attn.out_proj(out_x.transpose(1, 2).flatten(2)))
        y = y + block.ls_1(attn.out_proj(out_y.transpose(1, 2).flatten(2)))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        y = y + block.ls_2(block.mlp(block.ln_2(y)))
    y = y.view(n, n_cls, t, d)[:, torch.arange(n_cls, device=y.device), eot - p]  # [N, C, d]
    return enc.ln_final(y) @ enc.text_projection  # [N, C, D]
