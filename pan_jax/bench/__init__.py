"""The benchmark suite: `python -m pan_jax.bench MODE [--flags]`.

Modes, and what each measures:

* train (step.py): one training step of `--config` - forward, pixel
  cross-entropy ignoring 255, backward, SGD with momentum and weight decay,
  BatchNorm statistics update, state donated - on random data, batch 2 at
  512^2 by default: median step time, images/s, XLA's FLOP count and the
  achieved TFLOP/s, compile time, peak RSS and XLA's buffer plan.
* infer (step.py): the jitted eval-mode forward of `--config`, batch 1: the
  same record.
* data (data.py): the training input pipeline (decode, random scale, flip,
  crop, normalize, batch) on a temporary dataset of VOC-sized JPEGs, with
  0, 1 and 2 worker processes: images/s and images per CPU-second.
* eval (eval.py): the evaluation step (inference on the padded canvas plus
  the on-device confusion matrix) of `--eval_config`, single-scale and
  multi-scale + flip: images/s, compile time, peak RSS.
* loop (loop.py): the whole training loop, `python -m pan_jax.main
  --config=<--loop_config>` for `--steps` steps in a temporary workdir
  (pipeline, sharded step, metrics, checkpoints): steps/s and images/s from
  its metrics.jsonl, and the start-up overhead.
* memory (buffers.py): the train step of `--config` compiled once with an
  XLA dump; the values live at the peak of XLA's buffer plan, summed by kind
  (convolution output, layout copy, arguments, ...) and by part of the
  network (backbone stage, centre, decoder, loss), and the largest ones with
  their HLO op and layer.
* gpu (gpu.py): the accelerator suite for one GPU, within --budget_s (8
  minutes): pan_jax's train step in bfloat16 and float32 (images/s, MFU
  against the chip's peak, peak device memory), inference at batch 1 and 8,
  and smp.PAN with PyTorch AMP + channels_last (and torch.compile) on the
  same shapes (torch_peer.py); one table and one JSON record. On a CPU,
  with tiny flags, it is the suite's smoke test.
* all: every mode above but memory and gpu, in that order.

Every train, infer and eval measurement, and the training run of loop, runs
in a fresh subprocess (harness.py), so compile caches, allocator state and
peak RSS belong to that measurement alone; on CPU the subprocesses get
`runtime.cpu_env()` unless `--cpu_tuning=false`. With `--peer --peer_dir=DIR`
the PyTorch peer (segmentation_models_pytorch's PAN, DIR/bench_smp.py) is
measured in the same run for train and infer, alternating with pan_jax round
by round, and the report gives the time ratio pan_jax/smp per round and its
median: a ratio is only meaningful between runs made side by side on the
same machine. `--json=FILE` appends every record as a JSON line.
"""
