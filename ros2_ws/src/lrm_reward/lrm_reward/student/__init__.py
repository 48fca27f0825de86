"""A distilled reward student: a small CNN that gives progress and completion for every camera frame
between two reward-model queries (arXiv 2603.16065's named limitation: interval-hold repeats stale values).

- ``model``: the network (torch only) and the one resize shared by training and inference.
- ``store``: versioned students next to the adapters, ``<adapters>/student/vNNNN``.
- ``loading``: ``load_student``, which refuses a student of another task or camera; ``Student`` runs one.
- ``between``: ``StudentBetween``, a value per frame with the teacher's answers as anchors, and drift.
- ``dataset``: teacher labels (the judge's answers) and frames of recorded episodes (needs lerobot).
- ``evaluation``: student vs teacher on held-out episodes (progress MAD, completion agreement, VOC).
- ``train``: ``lrm-distill``.

``model``, ``store``, ``loading`` and ``between`` import neither ROS nor lerobot: they run in the reward node.
"""
