"""CausVid warp 4-step (cfg 2): upstream `configs/wan_causal_dmd_warp_4step_cfg2.yaml`, steps
[1000, 750, 500, 250] warped at shift 8 (t = 1000, 960, 888.89, 727.27).

The checkpoint folder `autoregressive_checkpoint_warp_4step_cfg2/` is in a third-party listing of the hub
repo `tianweiy/CausVid` at revision b545eb27 (not in CausVid's README); `model.pt` inside it is the file two
independent third-party download scripts fetch. Not checked against the hub from here (no network).
"""

from configs.causvid_wan21_t2v_1_3b import dit_file
from configs.causvid_wan21_t2v_1_3b import get_config as three_step


def get_config():
    recipe = three_step()
    return recipe.replace(slug="causvid-wan2.1-t2v-1.3b-warp-4step", steps=(1000, 750, 500, 250), warp=True,
                          weights={**recipe.weights,
                                   "dit": dit_file("autoregressive_checkpoint_warp_4step_cfg2/model.pt")})
