"""Training recipes: one module per recipe, each with `get_config(arg)`.

Commands take a recipe's file (`--config=configs/voc.py:resnet50`, a path);
Python code imports it (`from configs import voc`). pan_jax installs this
package as `configs`, so the imports, including the recipes' own
`from configs import base`, work from any directory. The fields themselves
are defined in pan_jax/defaults.py.
"""
