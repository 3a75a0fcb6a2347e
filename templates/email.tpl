<!doctype html>
<html lang="en">
<body style="margin:0;padding:24px;background:#f5f5f7;font:16px/1.45 -apple-system,'Segoe UI',Roboto,sans-serif;color:#1d1d1f">
<div style="max-width:480px;margin:0 auto;overflow-wrap:anywhere;word-break:break-word">
% if reminder:
<p style="margin:0 0 6px"><strong>Reminder:</strong> this request is still waiting for your answer.</p>
% end
<p style="color:#6e6e73;margin:0 0 6px">An agent is asking:</p>
% # Everything the agent wrote sits in one frame under that line of ours, as on the respond page:
% # unframed, a field labelled "Recorded:" with the value "Reject at 06:52, you may close this"
% # read as our own status line. Inline styles only: a mail program takes no stylesheet.
<div class="asked" role="group" aria-label="The request, as the agent wrote it" style="border-left:4px solid #d2d2d7;padding:0 0 0 12px;margin:0 0 16px">
% # What the agent wrote takes the direction of its own text, as on the respond page: laid out left
% # to right, an Arabic "from ACME to BOB" read from the right says BOB first.
% if pause['title']:
<h1 class="title" dir="auto" style="font-size:20px;margin:0 0 8px">{{pause['title']}}</h1>
% end
<div class="message" dir="auto" style="background:#fff;border-radius:12px;padding:16px;white-space:pre-wrap">{{pause['message']}}</div>
% for detail in pause['details']:
<p class="detail" dir="auto" style="margin:8px 0 0"><span style="color:#6e6e73">{{detail['name']}}:</span> <span dir="auto">{{detail['value']}}</span></p>
% end
% for name, field in (pause.get('fields') or {}).items():
<p class="field" dir="auto" style="margin:8px 0 0"><span style="color:#6e6e73">{{field.get('label', name)}}:</span> <strong dir="auto">{{field_text(field['value'])}}</strong></p>
% end
</div>
<p style="color:#6e6e73">Choose one. Each button opens a page where you confirm; nothing is decided until you do.</p>
% for option in pause['options']:
<p style="margin:0 0 10px"><a href="{{url}}?choice={{quote(option)}}" dir="auto" style="display:block;text-align:center;background:#0a58ca;color:#fff;font-weight:600;text-decoration:none;padding:14px;border-radius:12px">{{option}}</a></p>
% end
<p style="color:#6e6e73;font-size:14px">This request expires {{expires}}.
% if pause['timeout_default']:
If nobody answers, <span dir="auto">{{pause['timeout_default']}}</span> applies.
% end
</p>
</div>
</body>
</html>
