"""Whole model.py files, as source, for tests/test_rules.py: what a model file holds at its top
level is carried too, so the examples that hide a table there are run as modules of their own
(test_rules.model_file). They live here, not in test_rules.py, because text in a model's file is
counted too: test_rules.py imports this file only inside model_file, out of every model's reach.
{TABLE} stands for a table larger than the rules allow (test_rules.TABLE).
"""
INHERITS_TABLE = """
    class WithClassTable(Variant):
        BANK = torch.zeros({TABLE})

    class Net(WithClassTable):  # the table on a base class, not on the class the model is
        def forward(self, x):
            return super().forward(x + self.BANK[0])
"""
DEFAULT_ARGUMENT = """
    class Net(Variant):
        def forward(self, x, bank=torch.zeros({TABLE})):  # the table as a default value of forward's arguments
            return super().forward(x + bank[0])
"""
HELPER_CLASS = """
    class Tables:  # a helper class, not a module: its attribute is no parameter or buffer
        BANK = torch.zeros({TABLE})

    class Net(Variant):
        def forward(self, x):
            return super().forward(x + Tables.BANK[0])
"""
SUB_BLOCK_INSTANCE = """
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.zeros({TABLE}))

        def forward(self, x):
            return x + self.table[0]

    SHARED = Shift()  # an instance of a sub-block, not of Net: not a copy of the model

    class Net(Variant):
        def forward(self, x):
            return super().forward(SHARED(x))
"""
LAMBDA_CLOSURE = """
    class Net(Variant):
        def __init__(self):
            super().__init__()
            table = torch.zeros({TABLE})
            self.shift = lambda x: x + table[0]  # the table in the lambda's closure

        def forward(self, x):
            return super().forward(self.shift(x))
"""
NAMESPACE = """
    class Net(Variant):
        def __init__(self):
            super().__init__()
            self.tables = types.SimpleNamespace(bank=torch.zeros({TABLE}))

        def forward(self, x):
            return super().forward(x + self.tables.bank[0])
"""
HELPER_DEFAULT = """
    def shift(x, table=torch.zeros({TABLE})):  # a top-level helper's default argument
        return x + table[0]

    class Net(Variant):
        def forward(self, x):
            return super().forward(shift(x))
"""
PYTHON_LIST = """
    WEIGHTS = [0.0] * {TABLE}  # Python numbers, made a tensor in forward

    class Net(Variant):
        def forward(self, x):
            return super().forward(x + torch.tensor(WEIGHTS)[0])
"""
INSTANCE_AT_THE_TOP = """
    class Net(Variant):
        pass

    model = Net()  # a notebook-style instance: another copy of the model, not a table
"""
INSTANCE_WITH_A_TABLE = """
    class Net(Variant):
        def forward(self, x):
            return super().forward(x + model.bank[0])

    model = Net()
    model.bank = torch.zeros({TABLE})  # what the copy holds beyond the model counts
"""
BASE64_TABLE = """
    import base64
    import numpy as np

    BANK = base64.b64encode(np.zeros({TABLE}, np.float32).tobytes())  # the table as base64 bytes

    class Net(Variant):
        def forward(self, x):
            return super().forward(x + float(np.frombuffer(base64.b64decode(BANK), np.float32)[0]))
"""
SHORT_BYTES = """
    TAG = b"mnist-net-v1"  # a name, not a table

    class Net(Variant):
        def forward(self, x):
            return super().forward(x * len(TAG) / 12)
"""
DICT_TABLE = """
    BANK = {i: 0.0 for i in range({TABLE})}  # a dict of floats

    class Net(Variant):
        def forward(self, x):
            return super().forward(x + BANK[0])
"""
SMALL_DICT = """
    SETTINGS = {"scale": 1.0, "shift": 0.0}  # settings, not a table

    class Net(Variant):
        def forward(self, x):
            return super().forward(x * SETTINGS["scale"] + SETTINGS["shift"])
"""
ARRAY_TABLE = """
    import array

    BANK = array.array("f", bytes(4 * {TABLE}))  # the table as array.array

    class Net(Variant):
        def forward(self, x):
            return super().forward(x + BANK[0])
"""
SMALL_ARRAY = """
    import array

    SHIFT = array.array("f", [0.0, 0.0])

    class Net(Variant):
        def forward(self, x):
            return super().forward(x + SHIFT[0])
"""
LIBRARY_CLASS_TABLE = """
    nn.Softmin.BANK = torch.zeros({TABLE})  # the table set on a library's class

    class Net(Variant):
        def forward(self, x):
            return super().forward(x + nn.Softmin.BANK[0])
"""
LIBRARY_CLASS_SETTING = """
    nn.Softmin.SCALE = 1.0  # one number set on a library's class

    class Net(Variant):
        def forward(self, x):
            return super().forward(x * nn.Softmin.SCALE)
"""
