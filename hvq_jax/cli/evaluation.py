"""`hvq eval` and `hvq plot`: real files, metrics, baselines, RD plots."""
import os
import sys


def run_eval(argv):
  import argparse
  ap = argparse.ArgumentParser(prog="hvq eval")
  ap.add_argument("--checkpoint", required=True, help="training workdir or its checkpoints/")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step to load (default: the newest)")
  ap.add_argument("--out", required=True, help="results folder (results.csv, summary.json)")
  ap.add_argument("--images", default="bundled:heldout",
                  help="a folder of images (Kodak, CLIC), bundled:heldout, or tfds:NAME[:SPLIT]")
  ap.add_argument("--tfds-data-dir", default="")
  ap.add_argument("--limit", type=int, default=0, help="use only the first N images")
  ap.add_argument("--lmbdas", default=None, help="comma-separated; default: the trained lambdas")
  ap.add_argument("--ratios", default=None, help="'c,m,f;c,m,f'; default: the trained ratios")
  ap.add_argument("--fit-images", default="bundled:train",
                  help="images the static-histogram baseline is fitted on (the training set)")
  ap.add_argument("--baselines", default="jpeg,webp,avif")
  ap.add_argument("--lpips-net", default="alexnet", choices=("alexnet", "vgg16"))
  ap.add_argument("--lpips-weights", default=None, help="folder with alexnet/vgg16 .ckpt or .safetensors")
  ap.add_argument("--no-recon", action="store_true", help="do not save our reconstructions")
  ap.add_argument("--no-progress", action="store_true")
  ap.add_argument("--dataset", default=None,
                  help="what the images are (kodak, clic2020, div2k, tecnick): published curves "
                       "of that dataset are drawn and BD-rated beside ours; unknown: none")
  ap.add_argument("--dists-weights", default=None,
                  help="DISTS alpha/beta (.safetensors, or DISTS_pytorch's weights.pt); "
                       "default: the bundled copy")
  ap.add_argument("--no-dists", action="store_true")
  ap.add_argument("--inception-weights", default=None,
                  help="FID Inception weights pt_inception-2015-12-05-6726825d.pth (file or "
                       "folder; default $HVQ_INCEPTION_WEIGHTS, then torch hub's cache)")
  ap.add_argument("--no-fid", action="store_true", help="skip FID/KID")
  ap.add_argument("--no-plots", action="store_true", help="do not write the RD plots")
  a = ap.parse_args(argv)
  from hvq_jax import compile_cache
  compile_cache.enable()
  from hvq_jax import codec
  from hvq_jax.evaluation import evaluate
  from hvq_jax import images
  from hvq_jax.nn.model import ConfigError
  try:
    cmodel = codec.load_model(a.checkpoint, a.step)
    settings = evaluate.parse_settings(a.lmbdas, a.ratios, cmodel)
    imgs = evaluate.load_images(a.images, a.tfds_data_dir, a.limit)
    fit = evaluate.load_images(a.fit_images, a.tfds_data_dir)
  except (codec.CheckpointError, images.ImageError, ConfigError, ValueError, ImportError) as e:
    sys.exit(f"hvq eval: {e}")
  summary = evaluate.run(cmodel, imgs, settings, a.out, fit,
                         [b for b in a.baselines.split(",") if b], a.lpips_net, a.lpips_weights,
                         save_recon=not a.no_recon, progress=not a.no_progress,
                         command="hvq eval " + " ".join(argv), dataset=a.dataset,
                         dists=not a.no_dists, dists_alpha_beta=a.dists_weights,
                         fid_kid=not a.no_fid, inception_weights=a.inception_weights)
  from hvq_jax.evaluation import report
  print("\n".join(report.lines(summary)))
  print(f"wrote {a.out}/results.csv, {a.out}/fid_kid.csv and {a.out}/summary.json")
  if not a.no_plots:
    from hvq_jax.evaluation import plots
    files = plots.rd_plots([a.out], a.out)
    print("plots: " + " ".join(f for f in files if f.endswith(".png")))
  return 0


def run_plot(argv):
  import argparse
  ap = argparse.ArgumentParser(prog="hvq plot")
  ap.add_argument("results", nargs="+", help="folders written by hvq eval")
  ap.add_argument("--out", default=None, help="default: the first results folder")
  ap.add_argument("--strip", default=None, help="image name for a side-by-side strip")
  ap.add_argument("--images", default="bundled:heldout", help="where the strip's original is")
  ap.add_argument("--setting", default=None, help="our setting for the strip (default: middle)")
  ap.add_argument("--no-published", action="store_true")
  ap.add_argument("--dataset", default=None,
                  help="dataset of the evaluated images (default: what hvq eval recorded)")
  a = ap.parse_args(argv)
  from hvq_jax.evaluation import evaluate
  from hvq_jax import images
  from hvq_jax.evaluation import plots
  out = a.out or a.results[0]
  try:
    files = plots.rd_plots(a.results, out, not a.no_published, a.dataset)
    if a.strip:
      imgs = evaluate.load_images(a.images)
      if a.strip not in imgs:
        sys.exit(f"hvq plot: no image {a.strip!r} in {a.images} (have {sorted(imgs)})")
      files.append(plots.image_strip(a.results[0], a.strip, imgs[a.strip],
                                     os.path.join(out, f"strip_{a.strip}.png"), a.setting))
  except (FileNotFoundError, images.ImageError, KeyError) as e:
    sys.exit(f"hvq plot: {e}")
  print("\n".join(files))
  return 0
