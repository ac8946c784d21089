"""Retrieval metrics (mAP, CMC, mINP), the evaluation protocol, re-ranked evaluation, reports."""
