"""Helpers of the publishing tests: Python child processes talking to the test's server, and a
small engine-shaped CPU model (fused qkv, int8 weights with per-output-channel scales, a
non-persistent rotary inv_freq buffer, an lm_head tied to the embedding).

Child processes import this module too (it is importable from tests/python)."""
import hashlib
import os
import pathlib
import subprocess
import sys
import textwrap

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]


def child_prelude(runtime_dir, device="host"):
    """Python source that a child starts with: the package, this module and a client."""
    return textwrap.dedent(f"""
        import os, sys, time, json
        sys.path.insert(0, {str(REPO / 'python')!r})
        sys.path.insert(0, {str(HERE)!r})
        import companion
        client = companion.connect(device={device!r}, runtime_dir={str(runtime_dir)!r})
    """)


def run_child(runtime_dir, body, timeout=60, check=True, device="host"):
    """Runs prelude + body in a fresh interpreter; returns CompletedProcess (text)."""
    script = child_prelude(runtime_dir, device) + textwrap.dedent(body)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ))
    if check and r.returncode != 0:
        raise AssertionError(f"child failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def start_child(runtime_dir, body, device="host"):
    """Starts prelude + body with stdin/stdout pipes (line-buffered text)."""
    script = child_prelude(runtime_dir, device) + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            env=dict(os.environ))


def read_line(proc, expect=None, timeout=60):
    """The child's next line of output (waiting up to ``timeout`` s; the child is killed after
    that), checked to start with ``expect``."""
    import threading

    box = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box:
        proc.kill()
        raise AssertionError(f"no line from the child in {timeout} s: {proc.stderr.read()}")
    line = box[0]
    if not line:
        raise AssertionError(f"child exited ({proc.wait()}): {proc.stderr.read()}")
    line = line.strip()
    if expect is not None:
        assert line.startswith(expect), line
    return line


def digest_of(tensor):
    """sha256 of a companion.Tensor's, numpy array's or torch tensor's bytes."""
    import numpy as np

    if hasattr(tensor, "data_ptr") and callable(tensor.data_ptr):  # torch
        import torch

        t = tensor.detach().cpu().contiguous().reshape(-1)
        raw = t.view(torch.uint8) if t.dtype != torch.bool and t.numel() else t.to(torch.uint8)
        return hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    if isinstance(tensor, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(tensor).tobytes()).hexdigest()
    # companion.Tensor
    view = tensor.numpy(view_dtype="u%d" % tensor.itemsize) if tensor.nbytes else np.zeros(0)
    return hashlib.sha256(np.ascontiguousarray(view).tobytes()).hexdigest()


def digests(mapping):
    return {name: digest_of(t) for name, t in mapping.items()}


# ---- an engine-shaped model ---------------------------------------------------------------------

def engine_classes():
    """The model classes (defined lazily: torch is imported by the caller's choice)."""
    import torch
    from torch import nn

    class QLinear(nn.Module):
        """int8 weight [out, in] with a float32 scale per output channel; dequantizes in
        forward."""

        def __init__(self, in_features, out_features, device=None):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8,
                                                   device=device), requires_grad=False)
            self.scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32,
                                                  device=device), requires_grad=False)

        @classmethod
        def quantize(cls, linear):
            w = linear.weight.detach().float()
            scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            out = cls(w.shape[1], w.shape[0])
            out.weight.data = q
            out.scale.data = scale
            return out

        def forward(self, x):
            return x @ (self.weight.float() * self.scale[:, None]).t()

    def rotate(x, cos, sin):
        a, b = x.chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    class Attention(nn.Module):
        """Post-processed: one fused qkv (int8), o (int8); rotary from the inv_freq buffer."""

        def __init__(self, hidden, heads, device=None):
            super().__init__()
            self.hidden, self.heads = hidden, heads
            self.qkv = QLinear(hidden, 3 * hidden, device=device)
            self.o = QLinear(hidden, hidden, device=device)

        def forward(self, x, inv_freq):
            batch, length, _ = x.shape
            d = self.hidden // self.heads
            q, k, v = self.qkv(x).split(self.hidden, dim=-1)
            q, k, v = (t.view(batch, length, self.heads, d).transpose(1, 2) for t in (q, k, v))
            pos = torch.arange(length, dtype=torch.float32, device=x.device)
            freqs = torch.outer(pos, inv_freq)
            cos, sin = freqs.cos(), freqs.sin()
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            scores = (q @ k.transpose(-1, -2)) / (d ** 0.5)
            mask = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
            out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, self.hidden)
            return self.o(out)

    class Block(nn.Module):
        def __init__(self, hidden, heads, device=None):
            super().__init__()
            self.norm1 = nn.LayerNorm(hidden, device=device)
            self.attn = Attention(hidden, heads, device=device)
            self.norm2 = nn.LayerNorm(hidden, device=device)
            self.up = QLinear(hidden, 2 * hidden, device=device)
            self.down = QLinear(2 * hidden, hidden, device=device)

        def forward(self, x, inv_freq):
            x = x + self.attn(self.norm1(x), inv_freq)
            return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))

    class EngineModel(nn.Module):
        """The engine's (post-processed) form: what gets published and attached."""

        def __init__(self, vocab=128, hidden=32, heads=4, layers=2, device=None):
            super().__init__()
            self.embed = nn.Embedding(vocab, hidden, device=device)
            self.layers = nn.ModuleList(Block(hidden, heads, device=device)
                                        for _ in range(layers))
            self.norm = nn.LayerNorm(hidden, device=device)
            self.lm_head = nn.Linear(hidden, vocab, bias=False, device=device)
            self.lm_head.weight = self.embed.weight  # tied
            half = hidden // heads // 2
            self.register_buffer("inv_freq", torch.empty(half, device=device), persistent=False)

        def forward(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x, self.inv_freq)
            return self.lm_head(self.norm(x))

    class TrainedModel(nn.Module):
        """The checkpoint's form: separate float q/k/v/o, float MLP (as a trainer saves it)."""

        def __init__(self, vocab=128, hidden=32, heads=4, layers=2):
            super().__init__()
            self.vocab, self.hidden, self.heads = vocab, hidden, heads
            self.embed = nn.Embedding(vocab, hidden)
            self.layers = nn.ModuleList()
            for _ in range(layers):
                layer = nn.Module()
                layer.norm1, layer.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
                layer.q, layer.k, layer.v, layer.o = (nn.Linear(hidden, hidden, bias=False)
                                                      for _ in range(4))
                layer.up = nn.Linear(hidden, 2 * hidden, bias=False)
                layer.down = nn.Linear(2 * hidden, hidden, bias=False)
                self.layers.append(layer)
            self.norm = nn.LayerNorm(hidden)

    def post_process(trained):
        """TrainedModel -> EngineModel: fuse q/k/v, quantize every Linear to int8, compute
        inv_freq, tie lm_head to the embedding."""
        engine = EngineModel(trained.vocab, trained.hidden, trained.heads, len(trained.layers))
        with torch.no_grad():
            engine.embed.weight.copy_(trained.embed.weight)
            engine.norm.load_state_dict(trained.norm.state_dict())
            for src, dst in zip(trained.layers, engine.layers):
                dst.norm1.load_state_dict(src.norm1.state_dict())
                dst.norm2.load_state_dict(src.norm2.state_dict())
                fused = nn.Linear(src.q.in_features, 3 * src.q.out_features, bias=False)
                fused.weight.copy_(torch.cat([src.q.weight, src.k.weight, src.v.weight], 0))
                dst.attn.qkv = QLinear.quantize(fused)
                dst.attn.o = QLinear.quantize(src.o)
                dst.up = QLinear.quantize(src.up)
                dst.down = QLinear.quantize(src.down)
            d = trained.hidden // trained.heads
            engine.inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        for p in engine.parameters():
            p.requires_grad_(False)
        return engine.eval()

    return {"QLinear": QLinear, "EngineModel": EngineModel, "TrainedModel": TrainedModel,
            "post_process": post_process}


def build_engine(seed=0, **sizes):
    """A TrainedModel with random weights (seeded), post-processed into an EngineModel."""
    import torch

    classes = engine_classes()
    torch.manual_seed(seed)
    trained = classes["TrainedModel"](**sizes)
    with torch.no_grad():
        for layer in trained.layers:
            for norm in (layer.norm1, layer.norm2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.1, 0.1)
    return classes["post_process"](trained)


def engine_ids():
    import torch

    return torch.tensor([[1, 5, 9, 17, 33, 65, 127, 0], [3, 3, 100, 2, 7, 64, 12, 90]])
