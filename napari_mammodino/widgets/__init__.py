"""The dock widgets: thin views over the library. Each reads its image through ``napari_mammodino._sources``
and runs its computations through ``napari_mammodino._workers`` (a napari thread worker, one-line refusals,
Cancel), so the work itself is library code that tests and the CLI run too.

One idiom per role:

* Forms (a few inputs and a button; results appear as layers): a magicgui ``Container`` of magicgui widgets,
  as Tissue mask and Sampler QA are. magicgui gives labels, layout and typed values in a few lines and napari
  docks it as it is; the image chooser is ``_sources.ImagePicker``.
* Plain Qt only where magicgui has no widget for the job: plots (matplotlib canvases: Sampler QA's histogram,
  the jobs' loss and learning curves) and the two dashboards built around them. Training jobs is a live
  monitor (plots in tabs, a log tail, a polling ``QTimer``, path fields with several browse buttons, group
  boxes shown per job kind); Inference needs a Qt signal that queues lazily wanted DBT slices onto the Qt
  thread, a spin box whose 0 reads "encoder's own" and selectable result text. Their fields are Qt widgets,
  and their tests and the jobs-to-inference hand-over drive them through Qt's API.
"""
