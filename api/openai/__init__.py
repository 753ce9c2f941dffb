"""OpenAI's fine-tuning API under `/v1`, over the native job store: the `openai` SDK drives prefq with only its
`base_url` changed (`OpenAI(base_url="http://prefq:8000/v1", api_key="pq_...")`). Files (`files`), fine-tuning jobs
with their events and checkpoints (`jobs`), models (`models`), and the playground: chat and text completions by a
tenant's fine-tuned models (`chat`, through `prefq serve`); graders run and validated (`graders`); objects and states are translated in `shapes`,
errors answer in OpenAI's shape (`api.errors`)."""

from api.openai import chat, files, graders, jobs, models

routers = (files.router, jobs.router, models.router, chat.router, graders.router)
