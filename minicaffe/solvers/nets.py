"""The nets a solver definition names: the train net (``net``, ``net_param``, ``train_net`` or
``train_net_param``) and the test nets (``test_net``/``test_net_param``, else one per ``test_iter``
from the generic ``net``/``net_param``), each with its phase and state, with the ``weights`` files
copied in. Net files are found as given, else beside the solver file, else among the files
minicaffe ships; errors in a net name its file (or the solver field holding it).
"""
from __future__ import annotations

import os

from ..errors import MinicaffeError, SolverError
from ..formats.prototxt import load_net_param
from ..net.network import Net, in_file
from ..proto import caffe_pb2


class NetBuilder:
    """Builds the nets of solver parameters ``param`` read from ``solver_file`` (or None), logging on
    ``log`` as Caffe's solver does."""

    def __init__(self, param, solver_file, log):
        self.param, self.solver_file, self.log = param, solver_file, log
        self.where = solver_file or "<solver>"
        self._net_files = {}     # net file as the solver names it -> the path it was read from

    def resolve(self, field, value):
        """A path from the solver: as given (relative to the working directory, as Caffe), else relative
        to the solver file's directory; SolverError naming the field and the paths tried."""
        tried = [value]
        if os.path.exists(value):
            return value
        if self.solver_file and not os.path.isabs(value):
            alt = os.path.join(os.path.dirname(os.path.abspath(self.solver_file)), value)
            tried.append(alt)
            if os.path.exists(alt):
                self.log.info("%s '%s' is not in the working directory; using %s (beside the solver file)",
                              field, value, alt)
                return alt
        from ..core import shipped  # a documented path (models/lenet/...): the copy minicaffe ships
        found = shipped.resolve(value, field)
        if found != value:
            return found
        raise SolverError(f"{self.where}: {field} '{value}' not found (tried {', '.join(tried)})")

    def _read_net(self, field, value):
        path = self.resolve(field, value)
        self._net_files[value] = path
        return load_net_param(path)

    def _net_source(self, field, value):
        """What a net error should name: the net's file, or the solver's field holding it."""
        if field.endswith("_param"):
            return f"{self.where}: {field}"
        return self._net_files.get(value, value)

    def train_net(self):
        """The train net (phase TRAIN, the solver's ``train_state``), with the ``weights`` copied in."""
        p = self.param
        fields = ("net", "net_param", "train_net", "train_net_param")
        given = [f for f in fields if p.HasField(f)]
        if not given:
            raise SolverError(f"{self.where}: the solver must name a train net with one of: "
                              f"{', '.join(fields)}")
        if len(given) > 1:
            raise SolverError(f"{self.where}: give only one of {', '.join(fields)} for the train net "
                              f"(found {', '.join(given)})")
        field = given[0]
        if field.endswith("_param"):
            self.log.info("Creating training net specified in %s.", field)
            net_param = load_net_param(getattr(p, field))
        else:
            self.log.info("Creating training net from %s file: %s", field, getattr(p, field))
            net_param = self._read_net(field, getattr(p, field))
        state = caffe_pb2.NetState(phase=caffe_pb2.TRAIN)
        state.MergeFrom(net_param.state)
        state.MergeFrom(p.train_state)
        net_param.state.CopyFrom(state)
        try:
            net = Net(net_param, state.phase)
        except MinicaffeError as exc:
            raise in_file(exc, self._net_source(field, getattr(p, field)))
        self.load_weights(net)
        return net

    def test_nets(self, train_net):
        """The test nets (phase TEST, each its ``test_state``), sharing ``train_net``'s weights."""
        p = self.param
        where = self.where
        if p.HasField("net") and p.HasField("net_param"):
            raise SolverError(f"{where}: give either net or net_param, not both")
        generic = p.HasField("net") or p.HasField("net_param")
        specific = len(p.test_net_param) + len(p.test_net)
        n_iter = len(p.test_iter)
        if generic and n_iter < specific or not generic and n_iter != specific:
            raise SolverError(f"{where}: test_iter must be given for each test net ({specific} test "
                              f"net(s), {n_iter} test_iter value(s))")
        count = specific + (n_iter - specific)
        if len(p.test_state) and len(p.test_state) != count:
            raise SolverError(f"{where}: test_state must be left out or given once per test net "
                              f"({count} test nets, {len(p.test_state)} test_state entries)")
        if count and p.test_interval <= 0:
            raise SolverError(f"{where}: {count} test net(s) but test_interval is {p.test_interval}; "
                              f"set test_interval > 0 (or drop test_iter)")
        sources = []
        for tp in p.test_net_param:
            sources.append(("test_net_param", load_net_param(tp)))
        for name in p.test_net:
            sources.append((f"test_net file: {name}", self._read_net("test_net", name)))
        for _ in range(count - len(sources)):
            if p.HasField("net_param"):
                sources.append(("net_param", load_net_param(p.net_param)))
            else:
                sources.append((f"net file: {p.net}", self._read_net("net", p.net)))
        nets = []
        for i, (desc, net_param) in enumerate(sources):
            state = caffe_pb2.NetState(phase=caffe_pb2.TEST)
            state.MergeFrom(net_param.state)
            if len(p.test_state):
                state.MergeFrom(p.test_state[i])
            net_param.state.CopyFrom(state)
            self.log.info("Creating test net (#%d) specified by %s", i, desc)
            try:
                net = Net(net_param, state.phase)
            except MinicaffeError as exc:
                field, _, value = desc.partition(" file: ")
                raise in_file(exc, self._net_source(field if value else desc, value))
            self.load_weights(net)
            net.share_with(train_net)
            nets.append(net)
        return nets

    def load_weights(self, net):
        """Copy the solver's ``weights`` files (comma-separated lists allowed) into ``net``, in order."""
        for entry in self.param.weights:
            for name in entry.split(","):
                name = name.strip()
                if name:
                    self.log.info("Finetuning from %s", name)
                    net.copy_from(self.resolve("weights", name))
