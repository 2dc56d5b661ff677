"""Maps an OpenAI-Five-like policy and prints which parameters meet which input features.

    python examples/map_five.py
"""
import warnings

import fxsurgery as fs
from fxsurgery import zoo

warnings.simplefilter("ignore", UserWarning)  # nn.LSTM's export warning about flat weights

model, inputs, features = zoo.five_small()
traced = fs.trace(model, inputs, features)
imap = fs.interaction_map(traced)
print(imap.table())
print()
hp = features["self"].names[0]
reached = imap.params_for(hp)
print(f"feature {hp!r} reaches {len(reached)} parameters and buffers, "
      f"{sum(int(m.sum()) for m in reached.values())} elements in all")
print("its column in the first encoder layer:",
      reached["encoders.self.0.weight"].any(0).nonzero().reshape(-1).tolist())
