% rebase('dashboard.tpl', title='Pause', here='pauses', back='/dashboard/pauses')
<p><a href="/dashboard/pauses">← All pauses</a></p>
<h1>Pause <code>{{pause['pause_id']}}</code></h1>
<p><span class="status {{pause['status']}}" id="status">{{pause['status'].replace('_', ' ')}}</span>
% if pause['choice']:
 · choice <strong id="choice">{{pause['choice']}}</strong>
% end
% if pause['decided_by']:
 · by {{pause['decided_by']}} at {{pause['decided_at']}}
% end
</p>
% if pause.get('title'):
<p class="title" id="title" dir="auto"><strong>{{pause['title']}}</strong></p>
% end
<blockquote class="message" dir="auto">{{pause['message']}}</blockquote>
<dl class="facts">
  <dt>Options</dt><dd>{{', '.join(pause['options'])}}</dd>
% if 'recipients' in pause:
  <dt>Asked</dt><dd><ul class="people" id="people">
%   for person in pause['recipients']:
    <li>{{person['recipient']}} over {{person['channel']}}{{' (escalation)' if person['added_by'] == 'escalation' else ''}}: {{('chose ' + person['choice']) if person['choice'] else ('opened the link' if person['opened_at'] else (person['notification_status'] or 'link only'))}}</li>
%   end
  </ul></dd>
%   if pause['votes']:
  <dt>Votes</dt><dd><ol class="people" id="votes">
%     for vote in pause['votes']:
    <li>{{vote['recipient']}} chose {{vote['choice']}} at {{vote['voted_at']}}
%       for name, value in (vote['edits'] or {}).items():
      · {{pause['fields'][name].get('label', name)}} set to {{field_text(value)}}
%       end
%       if vote['comment']:
      <div class="text">{{vote['comment']}}</div>
%       end
    </li>
%     end
  </ol></dd>
%   end
%   if pause['quorum']:
  <dt>Quorum</dt><dd>{{pause['quorum']['count']}} × {{pause['quorum']['choice']}}; anything else decides at once</dd>
%   end
% else:
  <dt>Recipient</dt><dd>{{pause['recipient']}} over {{pause['channel']}}</dd>
% end
  <dt>If nobody answers</dt><dd>{{pause['timeout_default'] or 'nothing is decided'}} at {{pause['expires_at']}}</dd>
% if pause['comment']:
  <dt>Comment</dt><dd class="text" dir="auto">{{pause['comment']}}</dd>
% end
% if pause['notification']:
  <dt>Notification</dt><dd>{{pause['notification']['status']}} after {{pause['notification']['attempts']}} attempt(s){{(': ' + pause['notification']['last_error']) if pause['notification']['last_error'] else ''}}</dd>
  <dt>Text sent</dt><dd class="text" dir="auto">{{pause['notification']['text']}}</dd>
% else:
  <dt>Notification</dt><dd>none: the agent delivers the respond link</dd>
% end
% for name, field in (pause.get('fields') or {}).items():
  <dt>{{field.get('label', name)}}</dt><dd>{{field_text(field['value'])}}{{' (may be changed by the approver)' if field['editable'] and pause['status'] == 'pending' else ''}}{{(', changed from ' + str(field_text(pause['edited'][name]['old']))) if name in (pause.get('edited') or {}) else ''}}</dd>
% end
% if pause['metadata'] is not None:
  <dt>Metadata</dt><dd><pre class="text">{{json_text(pause['metadata'])}}</pre></dd>
% end
</dl>
% if pause['status'] == 'pending' and not expired:
% # A cancel cannot be undone: the button is a second step, behind a line that says what it does.
<details class="confirm" id="cancel">
  <summary>Cancel this pause…</summary>
  <form method="post" action="/dashboard/pauses/{{pause['pause_id']}}/cancel">
    <input type="hidden" name="csrf" value="{{csrf}}">
    <p>The agent is told it was cancelled and the person asked can no longer answer. This cannot be undone.</p>
    <button type="submit" class="danger">Yes, cancel this pause</button>
  </form>
</details>
% end
<h2>Timeline</h2>
% if earlier:
<p class="muted" id="timeline-earlier">Only its latest events are shown here: its whole history is in the <a href="/dashboard/audit?pause_id={{pause['pause_id']}}">audit log</a>.</p>
% end
<ol class="timeline" id="timeline">
% for event in timeline:
  <li><time>{{event['timestamp']}}</time> <strong>{{event['event_type']}}</strong> <span class="muted">by {{event['actor']}}</span></li>
% end
</ol>
