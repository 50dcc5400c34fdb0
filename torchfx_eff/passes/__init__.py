"""Normalize and match: turn a Dynamo graph into typed sites (and the misses, with reasons)."""
from . import attention, experts, linear, norms
from .epilogue import match as match_epilogues
from .graph import GraphInfo
from .normalize import normalize
from .siblings import fuse as fuse_siblings
from .sites import AttentionSite, Epilogue, ExpertsSite, LinearSite, Miss, Site

# One matcher per site family; each yields Site or Miss objects.
MATCHERS = {"attention": attention.match, "linear": linear.match, "experts": experts.match}

__all__ = ["MATCHERS", "AttentionSite", "Epilogue", "ExpertsSite", "GraphInfo", "LinearSite", "Miss", "Site", "fuse_siblings",
           "match_epilogues", "normalize", "norms"]
