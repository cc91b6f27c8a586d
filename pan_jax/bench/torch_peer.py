"""smp.PAN timed with PyTorch's fastest settings, for the accelerator suite.

`python -m pan_jax.bench gpu` runs this (`bench torch --one`) in its own
process with JAX kept on the CPU (JAX_PLATFORMS=cpu), so that the GPU's
memory belongs to PyTorch alone: segmentation_models_pytorch's PAN on CUDA
when there is one (else the CPU), autocast to bfloat16 (AMP), channels_last
and optionally torch.compile, on the same shapes as pan_jax's measurement.
torch and segmentation_models_pytorch are imported only here and only then;
pan_jax does not depend on them. ../shared/peer/bench_smp.py stays the CPU
reference; this measures the layout and precision a GPU user would pick.
"""

import resource
import statistics
import time
from typing import Any, Dict


def measure(mode: str, *, encoder: str, batch: int, size: int, classes: int,
            warmup: int, iters: int, amp: bool = True,
            channels_last: bool = True, compile_model: bool = False
            ) -> Dict[str, Any]:
  """Times smp.PAN's train step or inference in this process.

  Args:
    mode: 'train' (forward, cross-entropy ignoring 255, backward, SGD with
      momentum 0.9 and weight decay 1e-4) or 'infer' (eval, no_grad).
    encoder: smp's encoder name, e.g. 'resnet101' (random weights).
    batch, size, classes: the shapes (square images).
    warmup: untimed steps (torch.compile compiles in the first one).
    iters: timed steps.
    amp: autocast to bfloat16.
    channels_last: model and images in channels_last memory format.
    compile_model: wrap the model in torch.compile.

  Returns:
    A JSON-able record: mode, side 'smp', batch, size, device, device_kind,
    dtype, amp, channels_last, compile, times_s, median_s, images_per_s,
    warmup_s (compilation included), peak_device_mib (CUDA only) and
    peak_rss_mib.
  """
  import torch  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  import segmentation_models_pytorch as smp

  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  if cuda:
    torch.backends.cudnn.benchmark = True
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = smp.PAN(encoder_name=encoder, encoder_weights=None,
                  classes=classes).to(device, memory_format=fmt)
  images = torch.randn(batch, 3, size, size, device=device).to(
      memory_format=fmt)
  labels = torch.randint(0, classes, (batch, size, size), device=device)
  net = torch.compile(model) if compile_model else model
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

  if mode == 'train':
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=255)

    def step():
      optimizer.zero_grad(set_to_none=True)
      with autocast:
        loss = loss_fn(net(images).float(), labels)
      loss.backward()
      optimizer.step()
      return loss
  elif mode == 'infer':
    model.eval()

    def step():
      with torch.no_grad(), autocast:
        return net(images)
  else:
    raise ValueError(f'mode {mode!r}: expected train or infer')

  def timed():
    start = time.perf_counter()
    step()
    if cuda:
      torch.cuda.synchronize()
    return time.perf_counter() - start

  warmup_s = sum(timed() for _ in range(warmup))
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  times = [timed() for _ in range(iters)]
  median = statistics.median(times)
  record = {
      'mode': mode, 'side': 'smp', 'encoder': encoder, 'batch': batch,
      'size': size, 'classes': classes, 'device': device.type,
      'device_kind': (torch.cuda.get_device_name() if cuda else 'cpu'),
      'dtype': 'bfloat16' if amp else 'float32', 'amp': amp,
      'channels_last': channels_last, 'compile': compile_model,
      'times_s': [round(t, 4) for t in times], 'median_s': median,
      'images_per_s': batch / median, 'warmup_s': warmup_s,
      'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      'torch': torch.__version__,
  }
  if cuda:
    record['peak_device_mib'] = torch.cuda.max_memory_allocated() / 2**20
  return record
